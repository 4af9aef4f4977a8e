"""The tuned lens: its files (ours and the tuned-lens package's), the training corpus, training and
evaluation."""
