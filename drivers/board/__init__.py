"""Boards: the base, the none/image boards, MAX7219 matrices and serial Alpha signs."""
