// Closes cpu_capability_begin.h.
#pragma GCC diagnostic pop
#if defined(FUSEDLAYERS_CPU_AVX512) || defined(FUSEDLAYERS_CPU_AVX2)
#pragma GCC pop_options
#endif
