"""The vocabulary on flash: embedding rows read on demand, and a two-stage output head."""
