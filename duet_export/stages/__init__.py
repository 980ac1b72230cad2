"""The two DUET stages and the budget arithmetic that ties them together."""
