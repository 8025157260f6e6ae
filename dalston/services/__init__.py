"""Dalston's services: gateway, orchestrator, and the `dalston up` supervisor."""
