// The storage domain on-disk format v1, shared by metadata-tx, gc and data-mover.
export * from './layout';
export * from './validation';
export * from './records';
export * from './fsio';
export * from './domain';
export * from './fences';
export * from './confined';
export * from './qemu-img';
export * from './bitmaps';
export * from './roots';
export * from './nbd-client';
