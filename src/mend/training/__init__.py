"""Training an editor: the loop (`loop.train`) and its components, one job per module.

Nothing is imported here, so reading the shipped recipes does not load PyTorch.

    sampling   what a step draws: paraphrase and locality rows, hard locality inputs
    prepare    the passes before step 0: key statistics, nearest records, row-cache warm-up
    step       a step's losses by the fast or the reference path; validation
    schedule   per-step settings (learning rate, late part of the run, batched steps)
    optim      the optimiser, the update, a moving average of the weights
    logs       the JSONL training log
    recipe     the loader of recipe files; recipes/ holds the shipped ones
"""
