"""Partitions: one dynamic partition per source folder, shared by assets, jobs and sensors."""

import dagster as dg

SOURCES_PARTITIONS_NAME = "sources"

sources_partitions = dg.DynamicPartitionsDefinition(name=SOURCES_PARTITIONS_NAME)
