"""The server: the promoted model behind an OpenAI-compatible API (`--mode serve`).

  feedback  prompts, completions and user feedback in SQLite, exported exactly once as chunks into the
            online loop's watched folder
"""
