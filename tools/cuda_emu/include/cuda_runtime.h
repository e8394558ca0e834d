// CPU emulation stand-in for the CUDA header (see emu.h).
#pragma once
#include "emu.h"
