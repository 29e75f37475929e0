"""Peers (openai-whisper, faster-whisper) run side by side with wruntime, and their tooling."""
