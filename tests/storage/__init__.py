"""Test infrastructure for shards on an S3-compatible store: a moto server and a fault proxy."""
