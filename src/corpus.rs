//! Annotated report records and their JSONL form.
