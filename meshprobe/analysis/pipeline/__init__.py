"""The analysis pipeline: which hooks to read (`collect`), streaming accumulators for one model (`analyzer`), the
metrics.json format (`schema`), and the driver that samples tokens, runs a model and writes the outputs
(`analyze`)."""
