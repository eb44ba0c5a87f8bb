"""Online (continual) learning: replay of past data and regularizers against forgetting."""
