"""Datasets of tasks and expert demonstrations."""
