"""Runtime actors: one package per inference runtime, each a small class on the Dalston SDK."""
