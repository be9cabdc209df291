"""The warehouse schema, written once in types both backends read (DuckDB takes ``BYTEA``, ``REAL[]`` and
``DOUBLE PRECISION`` as aliases of its ``BLOB``, ``FLOAT[]`` and ``DOUBLE``), and its migrations.

``ensure_schema`` runs inside a write unit of work (under the backend's writer lock), so two processes
never create or migrate it at once.
"""

from __future__ import annotations

SCHEMA_VERSION = 3
# Migrations from an older schema version, in order: {from version: statements}.
MIGRATIONS = {
    1: ["ALTER TABLE chunks ADD COLUMN IF NOT EXISTS page INTEGER"],  # PDF pages (formats registry)
    # Contextual chunks: what the model reads besides the text, and its hash (the chunker's version
    # changed with them, so every document is chunked again and the columns are filled).
    2: ["ALTER TABLE chunks ADD COLUMN IF NOT EXISTS context VARCHAR",
        "ALTER TABLE chunks ADD COLUMN IF NOT EXISTS embed_sha256 VARCHAR"],
}

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (key VARCHAR, value VARCHAR)""",
    # raw_documents: one row per live file of a source; content kept so later stages never re-read disk.
    """CREATE TABLE IF NOT EXISTS documents (
        doc_id VARCHAR, source VARCHAR, relative_path VARCHAR, suffix VARCHAR,
        content_sha256 VARCHAR, size_bytes BIGINT, mtime_ns BIGINT, content BYTEA,
        first_seen TIMESTAMP, updated_at TIMESTAMP)""",
    # Files of a source that were refused or skipped at read time, replaced on each scan of that source.
    """CREATE TABLE IF NOT EXISTS skipped_files (
        source VARCHAR, relative_path VARCHAR, reason VARCHAR, recorded_at TIMESTAMP)""",
    # Documents that could not be cleaned (binary, no text...). Replaced per document on each clean.
    """CREATE TABLE IF NOT EXISTS quarantine (
        doc_id VARCHAR, source VARCHAR, relative_path VARCHAR, stage VARCHAR, reason VARCHAR,
        content_sha256 VARCHAR, recorded_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS cleaned_documents (
        doc_id VARCHAR, source VARCHAR, content_sha256 VARCHAR, cleaning_fingerprint VARCHAR,
        cleaned_sha256 VARCHAR, text VARCHAR, blocks VARCHAR, title VARCHAR, language VARCHAR,
        warnings VARCHAR, char_count BIGINT)""",
    # Which cleaned version of a document its chunks were made from, under which chunking settings.
    """CREATE TABLE IF NOT EXISTS chunked_documents (
        doc_id VARCHAR, source VARCHAR, cleaned_sha256 VARCHAR, chunking_fingerprint VARCHAR,
        chunk_count INTEGER)""",
    """CREATE TABLE IF NOT EXISTS chunks (
        chunk_id VARCHAR, vector_id BIGINT, doc_id VARCHAR, source VARCHAR, ordinal INTEGER,
        text VARCHAR, text_sha256 VARCHAR, start_char INTEGER, end_char INTEGER,
        heading_path VARCHAR, token_count INTEGER, page INTEGER, context VARCHAR, embed_sha256 VARCHAR)""",
    # Dedup decision per live chunk: canonical, or a duplicate of another live chunk.
    """CREATE TABLE IF NOT EXISTS chunk_dedup (
        chunk_id VARCHAR, source VARCHAR, text_sha256 VARCHAR, status VARCHAR,
        duplicate_of VARCHAR, similarity DOUBLE PRECISION, dedup_fingerprint VARCHAR, decided_in VARCHAR)""",
    # MinHash LSH band keys of canonical chunks: near-dup candidates across the whole corpus by a join.
    """CREATE TABLE IF NOT EXISTS minhash_bands (chunk_id VARCHAR, band INTEGER, band_key BIGINT)""",
    """CREATE TABLE IF NOT EXISTS minhash_signatures (chunk_id VARCHAR, signature BYTEA)""",
    """CREATE TABLE IF NOT EXISTS embeddings (
        chunk_id VARCHAR, vector_id BIGINT, source VARCHAR, text_sha256 VARCHAR,
        model_fingerprint VARCHAR, vector REAL[])""",
    """CREATE TABLE IF NOT EXISTS quantization_ranges (
        model_fingerprint VARCHAR, ranges BYTEA, dim INTEGER, sample_size INTEGER, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS quantized_embeddings (
        chunk_id VARCHAR, vector_id BIGINT, source VARCHAR, model_fingerprint VARCHAR,
        int8 BYTEA, ubinary BYTEA)""",
    "CREATE INDEX IF NOT EXISTS documents_source ON documents (source)",
    "CREATE INDEX IF NOT EXISTS chunks_doc ON chunks (doc_id)",
    "CREATE INDEX IF NOT EXISTS chunks_source ON chunks (source)",
    "CREATE INDEX IF NOT EXISTS dedup_chunk ON chunk_dedup (chunk_id)",
    "CREATE INDEX IF NOT EXISTS dedup_text ON chunk_dedup (text_sha256)",
    "CREATE INDEX IF NOT EXISTS bands_key ON minhash_bands (band_key)",
    "CREATE INDEX IF NOT EXISTS embeddings_chunk ON embeddings (chunk_id)",
]


class SchemaMismatch(Exception):
    """The warehouse holds another schema version than this release reads; ``found`` names it."""

    def __init__(self, found: str):
        super().__init__(found)
        self.found = found


def ensure_schema(con) -> None:
    """Create the tables on first use, migrate an older version in place; raise SchemaMismatch for another one.

    ``con`` is a write connection of either backend (``WarehouseConnection``).
    """
    if con.execute(
        # information_schema lists every database attached to the connection (DuckDB attaches each unit
        # of work's file to a shared host), so name this one.
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_name = 'meta' AND table_schema = current_schema() AND table_catalog = current_database()"
    ).fetchone()[0]:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row and row[0] == str(SCHEMA_VERSION):
            return
        found = int(row[0]) if row and str(row[0]).isdigit() else None
        if found is not None and found in MIGRATIONS and found < SCHEMA_VERSION:
            for version in range(found, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    con.execute(statement)
            for statement in SCHEMA:  # tables and indexes added since (all IF NOT EXISTS)
                con.execute(statement)
            con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            return
        if row:
            raise SchemaMismatch(str(row[0]))
    for statement in SCHEMA:
        con.execute(statement)
    con.execute("DELETE FROM meta WHERE key = 'schema_version'")
    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
