"""OpenAI-compatible online Q&A on Ray Serve (README.md, "Serving")."""
