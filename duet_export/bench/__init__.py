"""`duet-export bench`: speed, memory and FLOPs of compressed bundles side by side with the full model."""
