//! The worker process's heap.
//!
//! A step holds every micro-batch's gradient tensors until the reduction and then frees
//! them together (see [`crate::local_mean`]), megabytes at the top of the heap. glibc
//! returns such a top to the kernel (its trim threshold follows its mmap threshold, a
//! few hundred KiB), and the next step faults the same memory back in, page by page,
//! each page zeroed by the kernel: on `small` about 1,600 page faults a step, against
//! about 80 for a bare loop that frees each micro-batch's gradients as it adds them up.
//! A training process reuses the same sizes every step, so it keeps what it freed.

/// Keeps freed memory in the process for the next step: no heap trimming below 1 GiB,
/// and blocks up to 32 MiB (glibc's largest mmap threshold) from the heap rather than
/// from fresh mappings. Call it once, early in a worker process. Returns whether the C
/// library took both settings (only glibc has them).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any
        // time, from any thread.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
