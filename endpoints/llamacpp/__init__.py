"""llama.cpp's native server API: /infill, /tokenize, /detokenize."""
