"""Data in the formats users already have (LLaVA instruction JSON, JSONL questions) and GridDigits-VQA."""
