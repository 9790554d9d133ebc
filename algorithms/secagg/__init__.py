"""SecAgg+ secure aggregation: pure, typed protocol functions and state machines."""
