"""Serving: generation and sampling, tokenizer and chat templates, sessions with prefix reuse, tool-call
parsing, and the HTTP server."""
