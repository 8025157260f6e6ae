"""The Wyoming protocol server, for Home Assistant's voice assistants (`dalston serve wyoming`)."""
