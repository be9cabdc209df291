"""Removing a source: rows in every table, its partition, and its vectors from the next index."""

from __future__ import annotations

import shutil

import dagster as dg
import numpy as np
import pytest

from tests.pipeline_support import index_count
from embedding_assets.partitions import SOURCES_PARTITIONS_NAME
from embedding_assets.stages.remove_source import SourceRemovalError, remove_source
from tests.pipeline_support import make_pipeline


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.mark.slow
def test_remove_source_deletes_rows_partition_and_vectors(tmp_path, instance, warehouse_backend, warehouse_databases):
    pipeline = make_pipeline(tmp_path, instance, warehouse_url=warehouse_databases.new(warehouse_backend))
    pipeline.run_all()
    tables = ["documents", "skipped_files", "quarantine", "cleaned_documents", "chunked_documents", "chunks",
              "chunk_dedup", "embeddings", "quantized_embeddings"]  # fmt: skip
    with pytest.raises(SourceRemovalError, match="still exists"):
        remove_source(pipeline.warehouse, instance, "alpha", sources_root=pipeline.sources_root)
    alpha_ids = {row[0] for row in pipeline.rows("SELECT vector_id FROM embeddings WHERE source = 'alpha'")}
    assert alpha_ids

    shutil.rmtree(pipeline.sources_root / "alpha")
    report = remove_source(pipeline.warehouse, instance, "alpha", sources_root=pipeline.sources_root)
    assert report.partition_deleted and report.rows_deleted["embeddings"] == len(alpha_ids)
    assert instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME) == ["beta"]
    for table in tables:
        assert pipeline.rows(f"SELECT count(*) FROM {table} WHERE source = 'alpha'")[0][0] == 0, table
    dangling = pipeline.rows(
        "SELECT count(*) FROM chunk_dedup x WHERE duplicate_of IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM chunks k WHERE k.chunk_id = x.duplicate_of)"
    )[0][0]
    assert dangling == 0, "no decision may point at a removed chunk"

    assert report.sources_to_rerun == ["beta"], "the fixture's beta repeats alpha text"
    for source in report.sources_to_rerun:  # beta chunks that were duplicates of alpha get decided again
        pipeline.run_source(source)
    index = pipeline.run_index()
    live = pipeline.rows("SELECT count(*) FROM chunks JOIN chunk_dedup x USING (chunk_id) WHERE x.status = 'canonical'")[0][0]
    assert index["row_count"] == live > 0
    published = pipeline.resources["index_store"].current()
    assert not alpha_ids & set(np.load(published.path / "ids.npy").tolist())
    assert index_count(published) == live
    with pytest.raises(SourceRemovalError, match="no source named"):
        remove_source(pipeline.warehouse, instance, "alpha")
