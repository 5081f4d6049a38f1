"""Seeing a run: the console, the report and its plots, trackers."""
