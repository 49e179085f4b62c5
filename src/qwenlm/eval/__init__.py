"""Evaluations run on a loaded model; each module is one benchmark."""
