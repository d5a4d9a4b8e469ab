"""Upstreams: the OpenAI-compatible client Pura calls, and Pura's local stand-in provider."""
