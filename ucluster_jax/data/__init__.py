"""Data: parquet schema, streaming reader, converters, toy and simulated jets."""
