"""Scored sequences: a JSONL format any tool can write (format.py), its binarized folder, and the
recall tasks generated here (generators.py: MQAR, selective copying, passkey retrieval)."""
