"""`cboprune bench`: size and speed of pruned models (`measure`) and its command (`cli`)."""
