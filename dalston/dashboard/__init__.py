"""The terminal dashboard (`dalston dashboard`)."""
