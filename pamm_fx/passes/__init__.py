"""Graph passes, applied in order: normalize -> match -> rewrite."""
