// The machine's f32 FMA peak: 12 independent AVX2 FMA chains in registers (no memory traffic),
// the ceiling the CPU training numbers in docs/PERF.md are compared against.
//   gcc -O2 -mavx2 -mfma -o /tmp/fma_peak benches/fma_peak.c && /tmp/fma_peak        # one core
//   /tmp/fma_peak & /tmp/fma_peak; wait                                                  # both cores
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(){
  __m256 a[12]; __m256 x=_mm256_set1_ps(1.0000001f), y=_mm256_set1_ps(0.9999999f);
  for(int i=0;i<12;i++) a[i]=_mm256_set1_ps((float)i);
  long iters=400000000L/12*3;
  struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
  for(long it=0;it<iters;it++){
    #pragma GCC unroll 12
    for(int i=0;i<12;i++) a[i]=_mm256_fmadd_ps(a[i],x,y);
  }
  clock_gettime(CLOCK_MONOTONIC,&t1);
  double s=(t1.tv_sec-t0.tv_sec)+1e-9*(t1.tv_nsec-t0.tv_nsec);
  float acc=0; for(int i=0;i<12;i++){float v[8];_mm256_storeu_ps(v,a[i]);acc+=v[0];}
  printf("%.1f GFLOP/s (%g)\n", iters*12*16/s/1e9, acc);
}
