"""Joint hyper-parameter search (JHS), installed as `jaxyolo.search`. Filled by the search work."""
