"""embedding-pipeline: a Dagster asset graph from raw documents to a published FAISS IVF index."""
