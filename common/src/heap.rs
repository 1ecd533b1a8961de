//! Giving freed heap memory back to the kernel. glibc's allocator keeps
//! freed pages for reuse, so after a burst of connections, or a table build
//! (whose parse leaves much garbage), a process's RSS would stay at its
//! peak. Called only after such events, never per request.

/// Returns free pages at the top of the heap and in its arenas.
pub fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases pages no allocation uses; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
