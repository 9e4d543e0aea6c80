// What the command takes from the library: info(), Handle.map() and copy() of API.md's
// "Whole-export work" (info.ts, map.ts, copy.ts at the top of the package), and the shapes it
// reads from them. One place, so that the CLI modules name nothing else of the library's
// whole-export layer.

export {
  copy, info, type CopyEndpoint, type CopyOptions, type CopyProgress, type CopyResult, type ExportDetails,
  type ExportInfo, type MapExtent,
} from '../index'
export { COPY_LIMITS } from '../copy'
