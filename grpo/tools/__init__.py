"""Tools a policy calls during multi-turn rollouts: the sandboxed Python interpreter."""
