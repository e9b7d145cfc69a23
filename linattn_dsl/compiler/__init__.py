"""The compiler: spec language, lowering to the chunk plan, code generation, and finding specs."""
