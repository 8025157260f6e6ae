"""The HTTP gateway: OpenAI-compatible and native APIs over NATS. Holds no state of its own."""
