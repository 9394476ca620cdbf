//! semaphore
