"""The NATS layer: the embedded server, connections, and the JetStream layout."""
