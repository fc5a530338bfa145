"""Shared package of mistral-qa: config, prompt, data, model and adapter loading, generation."""
