"""llama.cpp's native server API: /completion, /slots, /infill, /tokenize, /detokenize."""
