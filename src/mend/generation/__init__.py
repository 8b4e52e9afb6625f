"""Generation edits (MEND's WikiText setting): records built from running text, and their
scores (edit success on the continuation, perplexity drawdown on held-out text)."""
