"""SSH and moving files and processes: connections, shell words, file sync, starting ranks and TCP."""
