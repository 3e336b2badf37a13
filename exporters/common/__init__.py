"""What every export format shares: layer forms (`forms`, gauge maths in `gauge`), the
manifest entry of one budget (`entry`), sample inputs (`sample`) and validation against
PyTorch (`validate`, errors in `errors`)."""
