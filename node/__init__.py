"""The node daemon: datasets, training worker, and the dial-out connection to the coordinator."""
