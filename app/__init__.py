"""raygrpo control plane: the job API on Ray Serve and everything behind it."""
