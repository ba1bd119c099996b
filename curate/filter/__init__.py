"""The filter stage: the recipe schema, the DuckDB engine with its ledger and step cache, the report, diff,
and the streamed DataComp select."""
