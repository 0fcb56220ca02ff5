"""Stubs generated from protos/*.proto by scripts/gen_protos.sh (a test fails on drift)."""
